from conveyor.scheduler.main import main

main()

from conveyor.step_runner.main import main

main()

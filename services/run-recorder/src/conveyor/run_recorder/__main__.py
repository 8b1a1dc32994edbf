from conveyor.run_recorder.main import main

main()

from conveyor.media.main import main

main()

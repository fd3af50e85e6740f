from edgeloop.monitor.app import main

main()

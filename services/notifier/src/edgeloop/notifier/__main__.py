from edgeloop.notifier.app import main

main()

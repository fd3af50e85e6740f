from edgeloop.console.app import main

main()

from edgeloop.registry.app import main

main()

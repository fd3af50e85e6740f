from edgeloop.gateway.app import main

main()

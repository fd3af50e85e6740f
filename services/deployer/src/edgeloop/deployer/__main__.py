from edgeloop.deployer.app import main

main()

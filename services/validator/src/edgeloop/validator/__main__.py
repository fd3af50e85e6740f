from edgeloop.validator.app import main

main()

from edgeloop.builder.app import main

main()

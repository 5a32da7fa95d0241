from seqforget.cli import main

main()

from knnlm.cli import main

main()

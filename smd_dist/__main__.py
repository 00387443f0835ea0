from smd_dist.cli import main

main()

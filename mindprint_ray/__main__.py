from mindprint_ray.cli.app import main

main()

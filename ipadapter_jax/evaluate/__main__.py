from ipadapter_jax.evaluate.cli import main

main()

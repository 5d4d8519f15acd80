from exporters.cli import main

main(prog_name="python -m exporters")

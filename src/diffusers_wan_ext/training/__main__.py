"""``python -m diffusers_wan_ext.training ARGS`` (same as ``diffusers-wan train ARGS``; several processes:
``accelerate launch -m diffusers_wan_ext.training ARGS``)."""

from .trainer import main

if __name__ == "__main__":
    main(prog="python -m diffusers_wan_ext.training")

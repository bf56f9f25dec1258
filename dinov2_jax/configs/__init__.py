"""The recipes shipped with the package: ml_collections config files with a `get_config(arg)` each.

Pass one to a command by path (`--config dinov2_jax/configs/pretrain.py:vits14`) or by name
(`--config pretrain:vits14`); `dinov2_jax.recipes` finds them in an installed package too.
"""

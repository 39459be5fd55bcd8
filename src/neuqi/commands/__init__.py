"""CLI sub-commands, one module each (see neuqi.cli)."""

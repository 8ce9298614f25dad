"""Subcommands of the `hfemb` CLI; see hfemb/cli.py for the convention."""

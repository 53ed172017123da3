"""Lets the installer map the repository root as edgeseek.app, the home of cli.py."""

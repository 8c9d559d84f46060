"""Tools for the people who write policy: rewriting policy data files between formats."""

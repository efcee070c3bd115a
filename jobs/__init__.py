"""Thin, resumable submitit entry points (one module per pipeline step)."""

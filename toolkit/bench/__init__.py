"""Benchmarks behind ``tumorsynth bench``: each returns the command's JSON object as a dict."""

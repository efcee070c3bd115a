"""Filters over synthetic stores: :mod:`toolkit.filter.zscore` drops masks far from the real training distribution."""

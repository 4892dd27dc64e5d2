"""Analyzers: pure computation over models; each returns a :class:`hpx_analysis.results.Result`."""

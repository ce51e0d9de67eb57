"""Plumbing every stage shares and nothing else: files written atomically (:mod:`.files`),
what produced a result (:mod:`.provenance`) and the metrics the harness reports, each
declared once (:mod:`.metrics`). Imports nothing of the harness but the toolkit."""

"""edge: an SNI-terminating TLS edge proxy for platforms hosting many apps."""

from edge import compiled

compiled.choose()  # before any compiled module is imported: the build, if current, or the sources

"""Models out of the framework: export to a model package, fast prediction runtimes, the HTTP server."""

"""Where conf/ is, the shape of every command's config, and the one validation all commands run."""

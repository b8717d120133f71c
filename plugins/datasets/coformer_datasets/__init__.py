"""Built-in data set plugins: named sets that ship offline, and loaders for users' own files by URI."""

"""Built-in CoFormer transports plugins."""

"""Built-in CoFormer aggregators plugins."""

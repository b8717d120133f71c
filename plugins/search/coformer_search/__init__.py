"""Built-in CoFormer search plugins."""

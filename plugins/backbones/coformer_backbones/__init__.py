"""Built-in CoFormer backbones plugins."""

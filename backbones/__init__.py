"""Vision backbones. Importing this package registers every family in zoo and timm."""

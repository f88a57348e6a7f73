"""Shipped recipes (YAML), installed as the package data of gift_quant.recipes."""

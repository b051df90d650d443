"""What a model is: its config, parameter inventory, catalog, storage formats and LoRA accounting."""

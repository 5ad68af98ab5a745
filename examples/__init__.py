"""Examples of research use: fine-tuning the demo adapters."""

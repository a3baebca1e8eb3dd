"""Model files from the Hugging Face Hub, fetched before a plan's engines need them."""

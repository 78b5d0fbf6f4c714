"""Task definitions (data, prompt, decoding, scorer) that hm3 optimises for."""

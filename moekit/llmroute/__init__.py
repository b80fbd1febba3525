"""Routing whole queries among LLMs by cost and quality. Stands apart from the rest of moekit."""

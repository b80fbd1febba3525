"""moekit."""

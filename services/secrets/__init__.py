"""The secrets service: encrypted, scoped, versioned secrets."""

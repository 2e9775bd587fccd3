"""Language-model data helpers: documents packed into a token stream, and the document boundaries of packed rows."""

"""Networks: the backbone adapter, the heads, and the SeCo network that joins them."""

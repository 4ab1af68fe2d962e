"""TCP load balancer for the chat servers."""

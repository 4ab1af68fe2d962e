from twisted.application.service import ServiceMaker

balancer = ServiceMaker(
    "balancer", "balancer.tap", "TCP load balancer for chat servers", "balancer"
)

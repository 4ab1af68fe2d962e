from twisted.application.service import ServiceMaker

chat = ServiceMaker(
    "chat", "chatproto.tap", "Cluster chat server (JSON and text dialects)", "chat"
)

"""The broker side: the MQTT client session, a private mosquitto (or embedded broker) for tests and the
demo, the hardened broker configuration and device provisioning."""

from floe_app.federated import server_app

app = server_app.app

from floe_app.federated import client_app

app = client_app.app

"""Studio: the Deployments page in the browser, served by the router at
/studio. Plain HTML/CSS/JS talking to the REST API; no build step."""

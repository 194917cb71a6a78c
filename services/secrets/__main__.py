from services.secrets.app import main

main()
